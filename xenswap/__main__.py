from xenswap.cli import main

raise SystemExit(main())
