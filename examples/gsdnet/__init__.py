"""GSDNet for facial expression recognition, built from the ``gradual_sd`` library.

One module per concept: ``models`` (the Table 2 configurations), ``weights`` (face-pretrained
checkpoints), ``datasets`` (RAF-DB, FERPlus, AffectNet, ImageFolder and the shipped stand-in),
``transforms`` (the paper's augmentation), ``engine`` (training and evaluation, single process or
DDP), ``checkpoint`` (atomic saves and resume) and ``metrics`` (accuracies, confusion matrix,
tables).
"""
