from lorlib_ui.cli.main import main

raise SystemExit(main())
