from lorlib_ui.cli import main

raise SystemExit(main())
