"""The private names of the libraries evomerge builds on, one module per library.

Everything else in evomerge uses public APIs only. A private name lives here when no public
API does the job; each module states the library versions it was checked against, and
``tests/compat/`` fails when a name moves. The bottom layer: it imports no other evomerge module.
"""
