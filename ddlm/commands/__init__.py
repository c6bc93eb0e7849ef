"""Command glue: what `ddlm sample` and `ddlm eval` do between the command line and the library
(loading a checkpoint, choosing a split, writing the output file). Library packages (`sampling/`,
`eval/`, `train/`, `nn/`, `methods/`) never import this package; the CLI, the comparison runner,
the quickstart and the viewers do."""
