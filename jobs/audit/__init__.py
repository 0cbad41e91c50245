"""The site audit log for staff: every AuditEntry (logins, API tokens, quota and
membership changes, team creation, host drains) with filters and CSV export."""
