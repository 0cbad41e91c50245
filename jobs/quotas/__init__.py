"""Who may use how much: the pure rules (`policy`: submit and dispatch decisions with
a reason; `placement`: hosts and contiguous core ranges; `fairshare`: the order of
the pending queue), the reads they need (`selectors`), quota changes with their
audit (`services`), and the staff quota page.

`policy`, `placement` and `fairshare` import no Django (checked by import-linter)."""
