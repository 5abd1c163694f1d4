"""Every CLI command module; importing this package registers them on ``kvfree.cli.app``."""

from kvfree.commands import bench_kernels, demo, info  # noqa: F401
