# shellcheck shell=sh
# Scenario "pre-copy" (what CI runs): a slowly dirtying container whose
# rounds converge to a small frozen step, then one that dirties faster than
# the link moves it, which must stop at the not-shrinking rule and still
# arrive intact. See cases.sh.
# Usage (by init): sh scenario-pre-copy.sh a|b
CASES=pre-copy:256K:converges,pre-copy:24M:stalls
# shellcheck source=scripts/vm/cases.sh
. /vm/cases.sh
run_cases "$1"
