from neuralhead.cli import main

raise SystemExit(main())
