"""A test family (tests/test_family_seam.py): nearest centroid on log1p CP10k counts, numpy
only. Copied into a scratch code repository as trainers/centroid/ to show that adding a family
is its folder, one line in trainers/family.py FAMILIES and one conf/parent option."""
