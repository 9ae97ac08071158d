import sys

from dtfd.ctl import main

sys.exit(main())
