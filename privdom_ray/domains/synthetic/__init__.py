"""A seeded, deterministic generator of synthetic multi-site chest radiographs (kind ``synthetic``).

Why: the demo grid and the tests need domains that exist without any download, are small enough
to train on in seconds, and still behave like the real problem: each label is tied to a visible
finding a CNN can learn, labels depend on age and sex, patients have follow-up images, and sites
differ in acquisition, population and labelling habits, so a model trained at one site is
measurably worse (but far better than chance) at another.

Layout of a generated domain root::

    root/images/<patient_id>_<k>.png   8-bit grayscale, ``file_size`` x ``file_size`` pixels
    root/synthetic.json                the options and generator version that made it
    root/labels.csv                    file, patient_id, sex, age, the five labels (written last)

``labels.csv`` is the completion marker: a root without it is never read as a domain. A missing
root is generated as a hidden sibling folder (``.<name>.synthetic-tmp-*``) and renamed into place
in one step; an existing (empty) root gets a hidden temp folder inside it whose contents are moved
in with renames, ``labels.csv`` last. An interrupted run therefore leaves at most a temp folder
(ignored; removed once it is an hour old) or an ``images/`` folder without ``labels.csv``
(replaced by the next run). When ``labels.csv`` exists it is read as is and never regenerated, so
it can be hand-edited; ``synthetic.json`` guards against reading a root made with other options.
The split is patient-wise by a salted hash (``synthetic:<site>``): 25% test, 15% val, 60% train
for sites a-d; the paper-shaped sites (``PAPER_SITES``) use their institution's test share.

Picture model: every image is a density map (air 0, soft tissue 0.3-0.6 with smooth thickness
gradients, aerated lung ~0.15-0.3, heart/mediastinum 0.72) drawn in patient ("body") coordinates,
seen through a per-image acquisition (zoom, shift, rotation, upright PA or supine AP) and a
per-site detector (gamma curve, contrast, offset, heel-effect ramp, large-radius unsharp
"processing", blur, noise, collimation). Findings, each tied to its label:

* cardiomegaly: cardiothoracic ratio (CTR) above the site's threshold; the heart is drawn with
  that CTR (magnified on supine AP films), so borderline hearts make the label genuinely hard.
* pleural_effusion: upright, fluid filling a lung base with a meniscus rising to the lateral
  wall (blunted costophrenic angle, hidden diaphragm); supine, a haze densest at the base.
* pneumonia: patchy consolidation: several textured blobs in one lung zone (lobar), or small foci
  in both lungs (multifocal, common at the ICU site).
* atelectasis: one or two dense plate-like bands in a lower lung, with volume loss (raised
  hemidiaphragm, mediastinum pulled toward it) when marked.
* healthy: 1 exactly when none of the four and no "other finding" (a lung nodule/mass), like a
  real "No Finding" label. Support devices (ECG electrodes, a central line) and, for women,
  breast shadows are nuisance and change no label.

Severities vary, and sites label mild findings differently (``min_labelled_severity``): a mild
effusion that site "a" calls positive is negative at site "c", as label definitions differ
between real institutions. Age raises cardiomegaly, effusion and atelectasis; cardiomegaly raises
effusion, effusion raises atelectasis, and a per-patient frailty links a patient's follow-ups.

The package, module by module (each names what it owns):

- ``profiles``: the site profiles (data tables: sites a-d and the paper-shaped sites) and the
  domain's options;
- ``population``: patients and their findings (labels), drawn from a site's profile;
- ``render``: one radiograph from a patient's findings and the site's acquisition;
- ``files``: the domain's files, written so that a root appears complete or not at all;
- ``adapter``: the registered ``synthetic`` domain kind: generate if absent, read the manifest.
"""

from privdom_ray.domains.synthetic.adapter import build, read_manifest
from privdom_ray.domains.synthetic.files import (
    CSV_COLUMNS,
    GENERATOR_VERSION,
    IMAGES_DIR,
    INFO_FILE,
    LABELS_FILE,
    STALE_TMP_SECONDS,
    TMP_PREFIX,
    generate,
    generate_images,
)
from privdom_ray.domains.synthetic.profiles import (
    PAPER_SITES,
    SITES,
    TEST_FRAC,
    VAL_FRAC,
    SiteProfile,
    SyntheticOptions,
)

__all__ = [
    "TEST_FRAC",
    "VAL_FRAC",
    "SiteProfile",
    "SITES",
    "PAPER_SITES",
    "SyntheticOptions",
    "GENERATOR_VERSION",
    "LABELS_FILE",
    "INFO_FILE",
    "IMAGES_DIR",
    "TMP_PREFIX",
    "STALE_TMP_SECONDS",
    "CSV_COLUMNS",
    "generate",
    "generate_images",
    "build",
    "read_manifest",
]
