"""``lmloop audit ...``: the parser for the audit verb; each audit module adds its own sub-verb."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``audit`` with its sub-verbs (bias, memorization, membership) to the top-level subparsers."""
    from lmloop.audit import bias, memorization

    s = sub.add_parser(
        "audit",
        help="counterfactual bias, memorization and membership-inference audits (gates for the loop)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Audits that measure what accuracy does not: does swapping an identity term change the\n"
        "prediction (bias), does a generative model reproduce its training data (memorization), can an\n"
        "attacker tell training members from held-out texts (membership). Each writes JSON and an HTML\n"
        "report; `lmloop loop` reads the same numbers as promotion gates (recipe gates:).",
    )
    asub = s.add_subparsers(dest="audit_verb", metavar="AUDIT")
    bias.add_cli(asub)
    memorization.add_cli(asub)
    s.set_defaults(fn=lambda a: (s.print_help(), 2)[1])
