package etcd

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// NewBackend is the backend of New without the shared layer over it, for
// tests that drive the SPI directly.
func NewBackend(cli *clientv3.Client, opts *Options) driver.Backend {
	return newBackend(cli, nil, opts)
}

// ProgressNotifications returns how many progress notifications the
// watches of b (made by NewBackend) have received.
func ProgressNotifications(b driver.Backend) int64 { return b.(*backend).progressed.Load() }

// Rotate makes b (made by NewBackend) act as if a response had shown a raft
// term after its lease's: it moves its publications to a new lease.
func Rotate(b driver.Backend) {
	be := b.(*backend)
	be.mu.Lock()
	ss := be.sess
	be.mu.Unlock()
	if ss != nil {
		be.sawTerm(ss.term + 1)
	}
}

// SetMoveHook has f called with each key rotate is about to move, before
// its transaction is sent.
func SetMoveHook(b driver.Backend, f func(key string)) { b.(*backend).moveHook = f }

// StalePut returns a function that sends the transaction a Publish of inst
// would send now, on the current session's lease: called later, it is a try
// of that Publish that a frozen member applies when it thaws. It reports
// whether the transaction succeeded.
func StalePut(b driver.Backend, inst driver.Instance) func() (bool, error) {
	be := b.(*backend)
	be.mu.Lock()
	lease := be.sess.id
	fence := be.fences[lease]
	be.mu.Unlock()
	val, _ := be.encode(inst)
	key := be.key(inst)
	return func() (bool, error) {
		resp, err := be.putTxn(context.Background(), key, val, lease, clientv3.Compare(clientv3.CreateRevision(key), "=", 0), fence)
		if err != nil {
			return false, err
		}
		return resp.Succeeded, nil
	}
}
