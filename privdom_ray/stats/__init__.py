"""Statistics on finished trials: metrics and their intervals, the transfer table, comparisons.

Reads trial folders through the store; never imports the training code or torch. In the
order of the flow (each module imports only those before it):

* :mod:`.inference`: the one CI/p rule (jackknife t), TOST verdicts, Holm/BH, pooling seeds;
* :mod:`.metrics`: input checks, AUC, label support, membership inference;
* :mod:`.resampling`: the leave-one-patient-out jackknife and the patient bootstrap;
* :mod:`.thresholds`: Youden thresholds, thresholded metrics, calibration;
* :mod:`.evaluation`: one test set's metric rows, subgroups, paired tests;
* :mod:`.results`: the transfer table, its privacy classes, aggregation;
* :mod:`.quantities`: the comparisons' quantities, columns and schemas;
* :mod:`.study`: finished trials' models and per-image predictions, loaded once;
* :mod:`.estimates`: per test set, the paired estimates (deltas, drops, gaps, reliability);
* :mod:`.comparison_rows`: per-seed and across-seed rows, tests and q-values;
* :mod:`.comparisons`: the comparisons and reliability tables (compute, write, load).
"""
