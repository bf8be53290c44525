"""What sits between the vcpu and the backends: sharing pages, notifications, supervisor, monitor."""
