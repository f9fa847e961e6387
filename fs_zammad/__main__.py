from fs_zammad.cli import main

raise SystemExit(main())
