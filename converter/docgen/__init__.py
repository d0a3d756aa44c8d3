"""Generated documentation: the package contract tables and the Swift examples of packages/README.md."""
