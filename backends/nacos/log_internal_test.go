package nacos

import (
	"io"
	"log/slog"
	"testing"

	sdklog "github.com/nacos-group/nacos-sdk-go/v2/common/logger"

	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
)

// appLogger stands for a logger an application installed in the SDK.
type appLogger struct{ SDKLogger }

// An application that configures the SDK's process-wide logger itself keeps
// it: NewClient and New with KeepSDKLogger neither replace it nor redirect
// the SDK's lines to their Logger. Without it, the SDK's lines go to the
// Logger of the last NewClient.
func TestKeepSDKLoggerLeavesTheApplicationsLogger(t *testing.T) {
	srv := nacosserver.Start(t)
	prev := sdkTarget.Load()
	t.Cleanup(func() { sdkTarget.Store(prev); sdklog.SetLogger(SDKLogger{}) })

	app := appLogger{}
	sdklog.SetLogger(app)
	mine := slog.New(slog.NewTextHandler(io.Discard, nil))
	cli, err := NewClient(ClientOptions{Servers: []string{srv.Addr()}, CacheDir: testutil.TempDir(t), Logger: mine, KeepSDKLogger: true})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.CloseClient()
	r, err := New(cli, &Options{Logger: mine, KeepSDKLogger: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := sdklog.GetLogger(); got != sdklog.Logger(app) {
		t.Fatalf("the SDK's logger is %T after NewClient and New with KeepSDKLogger, want the application's", got)
	}
	if sdkTarget.Load() == mine {
		t.Fatal("the SDK's lines were redirected to the Logger of a client with KeepSDKLogger")
	}

	cli2, err := NewClient(ClientOptions{Servers: []string{srv.Addr()}, CacheDir: testutil.TempDir(t), Logger: mine})
	if err != nil {
		t.Fatal(err)
	}
	defer cli2.CloseClient()
	if sdkTarget.Load() != mine {
		t.Fatal("without KeepSDKLogger the SDK's lines do not go to the Logger of the last NewClient")
	}
}
