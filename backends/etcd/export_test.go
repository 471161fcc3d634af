package etcd

import (
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
