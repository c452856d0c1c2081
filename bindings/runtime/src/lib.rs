//! Wiring shared by every searchloop front end: config, building the agent, the service.
