"""Arithmetic on model text without ``eval``: a restricted grammar with hard limits.

Grammar (ASCII only; whitespace between tokens is ignored)::

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := ('+' | '-') unary | power
    power  := atom ('**' | '^') unary  |  atom          (right-associative)
    atom   := INT | '(' expr ')'
    INT    := [0-9]+

Values are exact :class:`fractions.Fraction`. Limits (all keyword arguments of
:func:`evaluate`) are checked before any expensive step, so no input can make evaluation slow:
the text length, the number of tokens, the nesting depth, the digits of a literal, the size of an
exponent, and the bit length of every intermediate numerator and denominator. A power is
computed only after its result size has been bounded from the operand sizes. Every violation
raises :class:`ArithmeticLimitError` (a ``ValueError``); division by zero raises it too.
"""

from __future__ import annotations

import re
from fractions import Fraction

_TOKEN = re.compile(r"\s*(?:(\d+)|(\*\*|[-+*/^()]))", re.ASCII)


class ArithmeticLimitError(ValueError):
    """The expression is not in the grammar or breaks a limit."""


def tokenize(text: str, *, max_chars: int = 200, max_tokens: int = 100,
             max_digits: int = 12) -> list[str]:
    """Splits ``text`` into integer literals and operators, or raises ArithmeticLimitError."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ArithmeticLimitError(f"expression longer than {max_chars} chars")
    tokens, pos, n = [], 0, len(text)
    while pos < n:
        if text[pos:].isspace():
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ArithmeticLimitError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        num, op = m.groups()
        if num is not None and len(num) > max_digits:
            raise ArithmeticLimitError(f"integer literal longer than {max_digits} digits")
        tokens.append(num if num is not None else op)
        if len(tokens) > max_tokens:
            raise ArithmeticLimitError(f"more than {max_tokens} tokens")
        pos = m.end()
    if not tokens:
        raise ArithmeticLimitError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens, *, max_depth, max_bits, max_exponent, allow_pow):
        self.toks, self.i = tokens, 0
        self.max_depth, self.max_bits = max_depth, max_bits
        self.max_exponent, self.allow_pow = max_exponent, allow_pow
        self.literals: list[int] = []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def check(self, x: Fraction) -> Fraction:
        if x.numerator.bit_length() > self.max_bits or x.denominator.bit_length() > self.max_bits:
            raise ArithmeticLimitError(f"intermediate value exceeds {self.max_bits} bits")
        return x

    def expr(self, depth):
        if depth > self.max_depth:
            raise ArithmeticLimitError(f"nesting deeper than {self.max_depth}")
        x = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            y = self.term(depth)
            x = self.check(x + y if op == "+" else x - y)
        return x

    def term(self, depth):
        x = self.unary(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            y = self.unary(depth)
            if op == "*":
                x = self.check(x * y)
            else:
                if y == 0:
                    raise ArithmeticLimitError("division by zero")
                x = self.check(x / y)
        return x

    def unary(self, depth):
        if depth > self.max_depth:
            raise ArithmeticLimitError(f"nesting deeper than {self.max_depth}")
        if self.peek() in ("+", "-"):
            op = self.take()
            x = self.unary(depth + 1)
            return -x if op == "-" else x
        return self.power(depth)

    def power(self, depth):
        base = self.atom(depth)
        if self.peek() in ("**", "^"):
            if not self.allow_pow:
                raise ArithmeticLimitError("exponentiation is not allowed")
            self.take()
            exp = self.unary(depth + 1)
            return self.pow(base, exp)
        return base

    def pow(self, base: Fraction, exp: Fraction) -> Fraction:
        if exp.denominator != 1:
            raise ArithmeticLimitError("non-integer exponent")
        e = exp.numerator
        if abs(e) > self.max_exponent:
            raise ArithmeticLimitError(f"exponent larger than {self.max_exponent}")
        if base == 0 and e < 0:
            raise ArithmeticLimitError("division by zero")
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if bits * abs(e) > self.max_bits:  # the result has at most bits * |e| bits
            raise ArithmeticLimitError(f"power result exceeds {self.max_bits} bits")
        return self.check(base**e)

    def atom(self, depth):
        tok = self.take()
        if tok is None:
            raise ArithmeticLimitError("unexpected end of expression")
        if tok == "(":
            x = self.expr(depth + 1)
            if self.take() != ")":
                raise ArithmeticLimitError("unbalanced parentheses")
            return x
        if tok.isdigit():
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise ArithmeticLimitError(f"unexpected token {tok!r}")


def evaluate_with_literals(text: str, *, max_chars: int = 200, max_tokens: int = 100,
                           max_depth: int = 16, max_digits: int = 12, max_bits: int = 256,
                           max_exponent: int = 64, allow_pow: bool = True
                           ) -> tuple[Fraction, list[int]]:
    """Evaluates ``text`` and returns ``(value, integer literals in order of appearance)``.

    Raises:
      ArithmeticLimitError: not in the grammar, or a limit was hit (see the module docstring).
    """
    tokens = tokenize(text, max_chars=max_chars, max_tokens=max_tokens, max_digits=max_digits)
    p = _Parser(tokens, max_depth=max_depth, max_bits=max_bits, max_exponent=max_exponent,
                allow_pow=allow_pow)
    value = p.expr(0)
    if p.i != len(tokens):
        raise ArithmeticLimitError(f"unexpected token {tokens[p.i]!r}")
    return value, p.literals


def evaluate(text: str, **limits) -> Fraction:
    """Evaluates ``text`` under the limits of :func:`evaluate_with_literals`."""
    return evaluate_with_literals(text, **limits)[0]
