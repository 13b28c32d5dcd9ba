"""The `evomerge` command: the one place that knows all three layers.

`merging` (recipes, the engine), `evaluation` (tasks, the harness, the zoo) and `niches`
(the searches) each own the parser of their subcommand; `evomerge.cli` puts them under
one command. Nothing below imports this package, so the layers still run one way.
"""
