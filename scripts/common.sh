# Sourced by the shell wrappers: run from the repository root, with the settings from the environment.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-smollm2-135m}
PRESET=${PRESET:-cpu}
DATA=${DATA:-local}
METHODS=${METHODS:-}
PYTHON=${PYTHON:-python}

# task_set NAME: the comma-separated tasks of src.tasks.NAME (FIVE_TASKS or SEVEN_TASKS), the one list of tasks
task_set() { $PYTHON -c "import src.tasks as t; print(','.join(t.$1))"; }
