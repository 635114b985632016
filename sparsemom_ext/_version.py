"""The package version, in one place (read by the package, build_info() and the build)."""

__version__ = "0.1.0"
