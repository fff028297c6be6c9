from longtune.cli import main

raise SystemExit(main())
