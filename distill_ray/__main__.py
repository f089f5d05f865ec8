import sys

from distill_ray.cli import main

sys.exit(main())
