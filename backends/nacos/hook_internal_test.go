package nacos

import (
	"testing"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"

	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
)

type nopListener struct{}

func (nopListener) OnConnected()  {}
func (nopListener) OnDisConnect() {}

type otherClient struct{ naming_client.INamingClient }

// The connection hook reaches into the SDK's unexported fields: this fails
// when an SDK upgrade moves them.
func TestHookConnection(t *testing.T) {
	srv := nacosserver.Start(t)
	cli, err := NewClient(ClientOptions{Servers: []string{srv.Addr()}, CacheDir: testutil.TempDir(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.CloseClient()
	if !hookConnection(cli, nopListener{}) {
		t.Fatal("cannot hook the SDK's connection events: has the SDK's layout changed?")
	}
	if hookConnection(otherClient{cli}, nopListener{}) {
		t.Fatal("hooked a client of an unknown type")
	}
}
