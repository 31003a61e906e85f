# shellcheck shell=sh
# Scenario "compare": identical containers (same heap, same dirty rate)
# moved with stop-and-copy, pre-copy and hybrid in one boot, so their
# downtimes compare side by side. See cases.sh.
# Usage (by init): sh scenario-compare.sh a|b
CASES=stop-and-copy:256K:any,pre-copy:256K:converges,hybrid:256K:any
# shellcheck source=scripts/vm/cases.sh
. /vm/cases.sh
run_cases "$1"
