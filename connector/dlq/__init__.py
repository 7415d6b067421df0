"""Operator tools for the dead-letter topic: ``connector dlq inspect`` and ``redrive``.

- ``records``: a dead letter read back (its ``dlq-*`` headers), filters, safe display;
- ``ledger``: what earlier redrives copied, kept as the ``<group>-redrive`` offsets;
- ``reader``: reads the dead-letter topic (``read_committed``) to the end as of the start;
- ``plan``: what a redrive does with each dead letter, and the copy it writes;
- ``inspect`` / ``redrive`` (+ ``report``): the two commands; ``cli``: their arguments.
"""
