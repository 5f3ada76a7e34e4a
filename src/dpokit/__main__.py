from dpokit.cli import main

raise SystemExit(main())
