"""The mmexport command line (installed as ``mmexport.cli``): parses, calls the library, prints."""
