"""Tools around swinv2_fast that are not part of the installed package; run them from the repository root:

    python -m tools.compile_check ...      # the spill gate, the cost report, the sweep's candidates
    python -m tools.sweep OUT_DIR          # the GPU tile sweep (writes tuned_tiles.json)
    python -m tools.mutation --check       # the mutation harness (tools/mutants.py)

Layers, each importing only those below it: `launches` (the cases; recording and compiling a launch), then
`cost` (the static cost report) and `sweep` (the GPU tile sweep), then the `compile_check` command line.
`mutation` and `mutants` stand apart (they run the test suite on mutated copies of the repository).
"""
