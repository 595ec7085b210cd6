from ovis_service.cli import main

raise SystemExit(main())
