"""Where the workflow writes: the one home of every folder under results/.

The rules build each declared file from these names (`paths.split_csv("train")`) and hand a stage a
folder only as the folder of a declared file (rules/common.smk's `folder_of`: with remote storage
Snakemake rewrites declared files, so a folder must follow them). The stage CLIs take
their paths as arguments; their defaults, for running a stage by hand after `snakemake`, come from
here too. Moving a folder is an edit here. Light on purpose: Snakemake imports it while it builds
the DAG, before any job.
"""

RESULTS = "results"

DEMO_DATA = f"{RESULTS}/demo_data"  # the demo's phantom dataset, in NIH format
DEMO_CSV = f"{DEMO_DATA}/Data_Entry_2017.csv"
DEMO_IMAGES = f"{DEMO_DATA}/images"

STAGE_CONFIG = f"{RESULTS}/config"  # <stage>.yaml: the part of the configuration each stage reads
DATA = f"{RESULTS}/data"  # splits, the skip list, the verification report
SPLIT_CSV = f"{DATA}/{{split}}.csv"  # train, val, test, reserve
PREPARE_SUMMARY = f"{DATA}/prepare_summary.json"

MODELS = f"{RESULTS}/models"
TINY_SD = f"{MODELS}/tiny-sd"  # model.pretrained: tiny (random weights, built offline)
DEMO_BASE_REBUILT = f"{MODELS}/demo-base"  # snakemake pretrain_demo_base (the shipped one is resources/demo-base)

LORA = f"{RESULTS}/lora"  # checkpoints/, logs/, validation/, final/
LORA_FINAL = f"{LORA}/final"
LORA_SUMMARY = f"{LORA_FINAL}/training_summary.json"

SYNTHETIC = f"{RESULTS}/synthetic"  # plan.csv, one folder per label, the merged generation_results.csv
SYNTHETIC_LABEL = f"{SYNTHETIC}/{{label}}"
PLAN = f"{SYNTHETIC}/plan.csv"
GENERATED = f"{SYNTHETIC}/generation_results.csv"  # every label's images, merged
SYNTHETIC_BASE = f"{RESULTS}/synthetic_base"  # the LoRA-off control
SYNTHETIC_NOISE = f"{RESULTS}/synthetic_noise"  # the noise control's images
NOISE_GENERATED = f"{SYNTHETIC_NOISE}/generation_results.csv"  # the noise images, row for row the generated ones

CLASSIFIER = f"{RESULTS}/classifier"
CLASSIFIER_RUN = f"{CLASSIFIER}/{{arm}}_seed{{seed}}"  # one arm, one training seed
CLASSIFIER_CACHE = f"{RESULTS}/classifier_cache"  # decode-once image cache shared by every arm

EVALUATION = f"{RESULTS}/evaluation"  # fidelity, diversity, adherence
AUDIT = f"{EVALUATION}/audit"  # the memorization audit's pairs
FIDELITY_PAGE = f"{EVALUATION}/fidelity.md"
PLOTS = f"{RESULTS}/plots"
REPORT_PAGES = f"{RESULTS}/report"  # the .md results rendered for `snakemake --report`

READER_STUDY = f"{RESULTS}/reader_study"
READER_STUDY_PAGE = f"{READER_STUDY}/page"  # what readers get
READER_STUDY_KEY = f"{READER_STUDY}/key"  # what they never see
READER_STUDY_KEY_CSV = f"{READER_STUDY_KEY}/key.csv"


def split_csv(split: str) -> str:
    """The prepared CSV of one split."""
    return SPLIT_CSV.format(split=split)


def classifier_run(arm: str, seed: int) -> str:
    """The run folder of one arm and seed."""
    return CLASSIFIER_RUN.format(arm=arm, seed=seed)
