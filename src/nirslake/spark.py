"""``nirslake.spark``: the public name docs/spark.md gives for reading the lake from Spark.
It is ``nirslake.query.spark`` under a shorter name (the module object itself, not a copy)."""

import sys

from .query import spark

sys.modules[__name__] = spark
