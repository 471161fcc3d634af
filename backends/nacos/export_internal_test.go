package nacos

import (
	"reflect"
	"testing"

	"github.com/nacos-group/nacos-sdk-go/v2/clients/naming_client"
	"github.com/nacos-group/nacos-sdk-go/v2/common/constant"
	"github.com/nacos-group/nacos-sdk-go/v2/util"
)

// SDKCallbacks counts the callbacks the SDK holds for service (its
// ServiceInfoHolder.subCallback.callbackFuncMap), by reflection.
func SDKCallbacks(t *testing.T, cli naming_client.INamingClient, service string) int {
	t.Helper()
	h, ok := serviceCache(cli)
	if !ok {
		t.Fatal("no SDK service cache under the client")
	}
	sc, ok := unexported(reflect.ValueOf(h).Elem(), "subCallback")
	if !ok || sc.IsNil() {
		t.Fatal("no subCallback in the SDK's ServiceInfoHolder: has the SDK's layout changed?")
	}
	m, ok := unexported(sc.Elem(), "callbackFuncMap")
	if !ok {
		t.Fatal("no callbackFuncMap in the SDK's SubscribeCallback: has the SDK's layout changed?")
	}
	get := m.MethodByName("Get")
	out := get.Call([]reflect.Value{reflect.ValueOf(util.GetServiceCacheKey(util.GetGroupName(service, constant.DEFAULT_GROUP), ""))})
	if !out[1].Bool() {
		return 0
	}
	return out[0].Elem().Len()
}
