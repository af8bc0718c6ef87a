"""Backends that let other libraries' samplers run on batchd (docs/integrations.md).

Each submodule is an optional extra and imports its library only when imported itself:
`batchd.integrations.genlm` (pip install 'batchd[genlm]') and
`batchd.integrations.llamppl` (pip install 'batchd[llamppl]'). Importing this package
imports neither.
"""
