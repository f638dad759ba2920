import sys

from .pretrain import main

sys.exit(main())
