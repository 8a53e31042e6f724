from epmq.cli import main

raise SystemExit(main())
