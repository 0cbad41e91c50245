"""Notifications: subscriptions, the outbox and its delivery, idle cores, budget alerts."""
