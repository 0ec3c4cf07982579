"""GSDNet for facial expression recognition, built from the ``gradual_sd`` library.

One module per concept: ``models`` (the Table 2 configurations), ``shipped`` (the authors' code
as shipped, opt-in), ``weights`` (face-pretrained checkpoints and the authors' checkpoints),
``datasets`` (RAF-DB, FERPlus, AffectNet, ImageFolder and the shipped stand-in), ``transforms``
(the paper's augmentation), ``engine`` (training and evaluation, single process or DDP),
``checkpoint`` (atomic saves and resume) and ``metrics`` (accuracies, confusion matrix, tables).

``examples/train_gsdnet.py`` is ``cli`` (its flags, turned once into ``config.RunConfig``) over
``runner``, whose runs read as their steps, one module each: ``prepare`` (data), ``build`` (the
model and the run's identity), ``training``, ``selection`` (the one model every report
describes) and ``report`` (metrics.json, confusion matrix, early exits, comparison.md);
``console`` holds what the command prints.
"""
