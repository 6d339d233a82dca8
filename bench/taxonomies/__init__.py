"""Generated taxonomies for the development taxonomy suite (bench/taxonomy_suite.py): dataset folders drawn
with our own code on real ELPV cells, written outside the repository."""
