// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 at the
// version pinned in this module's go.mod. It exists so that tests can run a
// real etcd as a child process; scripts/build-servers.sh builds it into the
// user cache directory.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
