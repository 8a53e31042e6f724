import sys

from epmq.warm import run_warm

# forked from a warm server when one runs (python -m epmq.warm), else started here
code = run_warm(sys.argv[1:])
if code is None:
    from epmq.cli import main

    code = main()
raise SystemExit(code)
