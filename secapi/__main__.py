from secapi.cli import main

raise SystemExit(main())
