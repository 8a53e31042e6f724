from epmq.hub.cli import main

raise SystemExit(main())
