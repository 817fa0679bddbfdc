"""5-fold cross-validation of the default CNN on all 1797 digits (scikit-learn's train + test).

Command:
  python -m imgcls_jax.main --config=configs/digits_cv.py --workdir=/tmp/imgcls_digits_cv
Expected (seed 0): top-1 99.56% +- 0.38 over the folds (pooled out-of-fold 99.55%: 8 of 1797
wrong), in 127 s on a 2-core Zen 4 AMD EPYC (2026-12-05; ~14 min on shared cores earlier), and no
likely label issue (<workdir>/cv_label_issues.csv is empty: imgcls_jax/label_issues.py). sklearn's SVC(gamma=0.001) scores 99.0% +- 0.4 in
shuffled stratified 5-fold CV (99.11% +- 0.32 on these very folds). The label smoothing that buys
the accuracy leaves the model under-confident: ECE ~0.10 (the reliability diagrams show it);
configs/default.py's settings give 99.11% +- 0.54 with ECE ~0.008.
Each fold trains in <workdir>/fold_<i> and resumes there; the summary is <workdir>/cv_report.md.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.tfds_digits(default.get_config())   # through tf.data, as measured
  c.data.train_split = 'train+test'       # all 1797 images; each fold holds out a fifth
  c.cross_validation.folds = 5
  c.num_epochs = 60.0
  c.label_smoothing = 0.1
  c.model.dropout = 0.1
  return c
