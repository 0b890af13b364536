"""The mmexport test suite (a package, so same-named test modules in subfolders do not collide)."""
