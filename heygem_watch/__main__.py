from heygem_watch.cli import main

raise SystemExit(main())
