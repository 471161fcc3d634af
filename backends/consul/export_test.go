package consul

// MaxWrites is how many service writes a backend has in flight at most.
const MaxWrites = maxWrites
