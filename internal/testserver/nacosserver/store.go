package nacosserver

import (
	"cmp"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/nacos-group/nacos-sdk-go/v2/api/grpc"
	"github.com/nacos-group/nacos-sdk-go/v2/model"
)

// svcKey is com.alibaba.nacos.naming.core.v2.pojo.Service's identity:
// namespace, group and name (the cluster belongs to each instance).
type svcKey struct{ ns, group, name string }

// grouped is NamingUtils.getGroupedName: "group@@name".
func (k svcKey) grouped() string { return k.group + "@@" + k.name }

// service is a ServiceManager singleton plus what foreign writers injected.
type service struct {
	key      svcKey
	injected []model.Instance
}

// client is a Nacos ConnectionBasedClient: one per registered connection.
// Its maps are guarded by Server.mu.
type client struct {
	id       string
	remote   string
	run      *runState
	clientIP string
	version  string
	tenant   string
	labels   map[string]string

	// published is AbstractClient.publishers: one entry per service, a single
	// instance (registerInstance) or a list (batchRegisterInstance).
	published  map[svcKey][]model.Instance
	subscribed map[svcKey]struct{}
	acks       map[string]*pendingAck

	out        *outbox
	done       chan struct{} // closed when unregistered
	senderDone chan struct{} // closed when the stream writer has returned
}

type pendingAck struct {
	push     *svcKey   // a NotifySubscriberRequest for this service, or nil
	deadline time.Time // for pushes
	ch       chan bool // for DetectClients/SendConnectReset: success of the answer
}

// outbox is a connection's unbounded queue of server requests, written to the
// stream by one goroutine, so that a slow client never blocks the server.
type outbox struct {
	mu     sync.Mutex
	q      []*pb.Payload
	notify chan struct{}
}

func newOutbox() *outbox { return &outbox{notify: make(chan struct{}, 1)} }

func (o *outbox) push(p *pb.Payload) {
	o.mu.Lock()
	o.q = append(o.q, p)
	o.mu.Unlock()
	select {
	case o.notify <- struct{}{}:
	default:
	}
}

func (o *outbox) pop() *pb.Payload {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.q) == 0 {
		return nil
	}
	p := o.q[0]
	o.q[0] = nil
	o.q = o.q[1:]
	return p
}

var lastStamp atomic.Int64

// nextStamp is a lastRefTime: the current time in milliseconds, as Nacos uses,
// but strictly increasing across the process. The SDK drops a ServiceInfo
// whose lastRefTime is not greater than the one it holds
// (ServiceInfoHolder.ProcessService), so two changes in one millisecond must
// not share a stamp.
func nextStamp() uint64 {
	for {
		old := lastStamp.Load()
		now := max(time.Now().UnixMilli(), old+1)
		if lastStamp.CompareAndSwap(old, now) {
			return uint64(now)
		}
	}
}

func (s *Server) ensureServiceLocked(k svcKey) *service {
	svc := s.services[k]
	if svc == nil {
		svc = &service{key: k}
		s.services[k] = svc
	}
	return svc
}

func addIndex(m map[svcKey]map[string]struct{}, k svcKey, id string) bool {
	set := m[k]
	if set == nil {
		set = make(map[string]struct{})
		m[k] = set
	}
	if _, ok := set[id]; ok {
		return false
	}
	set[id] = struct{}{}
	return true
}

func removeIndex(m map[svcKey]map[string]struct{}, k svcKey, id string) {
	if set := m[k]; set != nil {
		delete(set, id)
		if len(set) == 0 {
			delete(m, k)
		}
	}
}

// publishLocked is EphemeralClientOperationServiceImpl#registerInstance /
// #batchRegisterInstance: the connection's publication for the service is
// replaced, and ClientServiceIndexesManager publishes a ServiceChangedEvent.
func (s *Server) publishLocked(c *client, k svcKey, insts []model.Instance) {
	s.ensureServiceLocked(k)
	for i := range insts {
		for key, v := range s.addedMeta {
			insts[i].Metadata[key] = v
		}
	}
	s.wroteLocked(k, insts, c.published[k])
	c.published[k] = insts
	addIndex(s.publishers, k, c.id)
	s.changedLocked(k)
}

// unpublishLocked is EphemeralClientOperationServiceImpl#deregisterInstance:
// nothing happens for a service that does not exist or that this connection
// did not publish; otherwise its whole publication goes, whatever instance
// the request named.
func (s *Server) unpublishLocked(c *client, k svcKey) {
	if s.services[k] == nil {
		return
	}
	if _, ok := c.published[k]; !ok {
		return
	}
	delete(c.published, k)
	removeIndex(s.publishers, k, c.id)
	s.changedLocked(k)
}

// subscribeLocked is #subscribeService; only a first subscription triggers
// the push to that subscriber (ClientServiceIndexesManager#addSubscriberIndexes,
// "Only first time add need notify event").
func (s *Server) subscribeLocked(c *client, k svcKey) {
	c.subscribed[k] = struct{}{}
	if addIndex(s.subscribers, k, c.id) {
		s.addPushTaskLocked(k, s.pushDelay, c.id)
	}
}

func (s *Server) unsubscribeLocked(c *client, k svcKey) {
	delete(c.subscribed, k)
	removeIndex(s.subscribers, k, c.id)
}

// unregisterLocked is ConnectionManager#unregister followed by
// ClientServiceIndexesManager#handleClientDisconnect.
func (s *Server) unregisterLocked(c *client) {
	if s.conns[c.id] != c {
		return
	}
	delete(s.conns, c.id)
	for k := range c.published {
		removeIndex(s.publishers, k, c.id)
		s.changedLocked(k)
	}
	for k := range c.subscribed {
		removeIndex(s.subscribers, k, c.id)
	}
	clear(c.acks)
	close(c.done)
	s.logf("connection %s unregistered", c.id)
}

// instancesLocked is ServiceStorage#getAllInstancesFromIndex (plus the
// injected instances), in a stable order.
func (s *Server) instancesLocked(k svcKey) []model.Instance {
	hosts := []model.Instance{}
	for id := range s.publishers[k] {
		if c := s.conns[id]; c != nil {
			for _, inst := range c.published[k] {
				hosts = append(hosts, copyInstance(inst))
			}
		}
	}
	if svc := s.services[k]; svc != nil {
		for _, inst := range svc.injected {
			hosts = append(hosts, copyInstance(inst))
		}
	}
	slices.SortStableFunc(hosts, func(a, b model.Instance) int {
		return cmp.Or(cmp.Compare(a.Ip, b.Ip), cmp.Compare(a.Port, b.Port),
			cmp.Compare(a.ClusterName, b.ClusterName), cmp.Compare(a.InstanceId, b.InstanceId))
	})
	return hosts
}

// getPushDataLocked is ServiceStorage#getPushData: the service's current data,
// cached for getData. A service that does not exist yields an empty, uncached
// ServiceInfo.
func (s *Server) getPushDataLocked(k svcKey) model.Service {
	info := model.Service{
		Name:        k.name,
		GroupName:   k.group,
		CacheMillis: 10000, // SwitchDomain#getDefaultPushCacheMillis
		Hosts:       []model.Instance{},
		LastRefTime: nextStamp(),
		Valid:       true,
	}
	if s.services[k] == nil {
		return info
	}
	info.Hosts = s.instancesLocked(k)
	s.snapshots[k] = info
	return info
}

// getDataLocked is ServiceStorage#getData: the data cached by the last push
// computation (so possibly older than the latest change, by up to the push
// delay), computed now if there is none.
func (s *Server) getDataLocked(k svcKey) model.Service {
	if info, ok := s.snapshots[k]; ok {
		info.Hosts = slices.Clone(info.Hosts)
		return info
	}
	return s.getPushDataLocked(k)
}

// selectInstances is ServiceUtil#doSelectInstances: a new ServiceInfo with
// lastRefTime now, filtered by cluster list, health and enabled flag. The
// protect threshold never applies: it needs service metadata, which only
// the admin API creates.
func selectInstances(src model.Service, cluster string, healthyOnly, enableOnly bool) model.Service {
	out := model.Service{
		Name:        src.Name,
		GroupName:   src.GroupName,
		CacheMillis: src.CacheMillis,
		LastRefTime: nextStamp(),
		Clusters:    cluster,
		Hosts:       []model.Instance{},
		Valid:       true,
	}
	var clusters []string
	if strings.TrimSpace(cluster) != "" {
		clusters = strings.Split(cluster, ",")
	}
	for _, inst := range src.Hosts {
		if len(clusters) > 0 && !slices.Contains(clusters, inst.ClusterName) {
			continue
		}
		if enableOnly && !inst.Enable {
			continue
		}
		if healthyOnly && !inst.Healthy {
			continue
		}
		out.Hosts = append(out.Hosts, copyInstance(inst))
	}
	return out
}

// Keys of Instance metadata that Nacos reads (PreservedMetadataKeys) and their
// defaults (Constants.DEFAULT_HEART_BEAT_TIMEOUT etc.).
const (
	keyHeartBeatInterval = "preserved.heart.beat.interval"
	keyHeartBeatTimeout  = "preserved.heart.beat.timeout"
	keyIPDeleteTimeout   = "preserved.ip.delete.timeout"
)

var clusterNamePattern = regexp.MustCompile(`^[0-9a-zA-Z-]+$`) // Constants.CLUSTER_NAME_PATTERN_STRING

func metaMillis(md map[string]string, key string, def int64) (int64, error) {
	v, ok := md[key]
	if !ok || v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("For input string: %q", v) // Long.parseLong's message
	}
	return n, nil
}

// heartBeats reads the three preserved timing keys as the Java Instance
// getters do.
func heartBeats(md map[string]string) (interval, timeout, ipDelete int64, err error) {
	if interval, err = metaMillis(md, keyHeartBeatInterval, 5000); err != nil {
		return
	}
	if timeout, err = metaMillis(md, keyHeartBeatTimeout, 15000); err != nil {
		return
	}
	ipDelete, err = metaMillis(md, keyIPDeleteTimeout, 30000)
	return
}

// checkInstanceIsLegal is NamingUtils#checkInstanceIsLegal, run by
// EphemeralClientOperationServiceImpl#registerInstance (not by the batch
// registration).
func checkInstanceIsLegal(inst model.Instance) error {
	interval, timeout, ipDelete, err := heartBeats(inst.Metadata)
	if err != nil { // Long.parseLong throws NumberFormatException: a plain failure
		return &nacosError{code: codeServerError, msg: err.Error()}
	}
	if timeout < interval || ipDelete < interval {
		return &nacosError{code: codeInvalidParam,
			msg: "Instance 'heart beat interval' must less than 'heart beat timeout' and 'ip delete timeout'."}
	}
	if inst.ClusterName != "" && !clusterNamePattern.MatchString(inst.ClusterName) {
		return &nacosError{code: codeInvalidParam,
			msg: "Instance 'clusterName' should be characters with only 0-9a-zA-Z-. (current: " + inst.ClusterName + ")"}
	}
	return nil
}

// setInstanceIDIfEmpty is InstanceUtil#setInstanceIdIfEmpty with the default
// generator (DefaultInstanceIdGenerator): "ip#port#clusterName#serviceName",
// the cluster as sent (possibly empty) and the grouped service name.
func setInstanceIDIfEmpty(inst *model.Instance, k svcKey) {
	if inst.InstanceId != "" {
		return
	}
	if strings.TrimSpace(inst.ServiceName) == "" {
		inst.ServiceName = k.grouped()
	}
	inst.InstanceId = inst.Ip + "#" + strconv.FormatUint(inst.Port, 10) + "#" + inst.ClusterName + "#" + inst.ServiceName
}

// publishInfo turns a registered instance into what subscribers will see:
// ClientOperationService#getPublishInfo followed by
// InstanceUtil#parseToApiInstance. Weight, enabled, healthy and metadata come
// back as sent; the cluster defaults to "DEFAULT"; ephemeral is the service's
// (always true here).
func publishInfo(inst model.Instance, k svcKey) model.Instance {
	cluster := inst.ClusterName
	if strings.TrimSpace(cluster) == "" {
		cluster = "DEFAULT" // UtilsAndCommons.DEFAULT_CLUSTER_NAME
	}
	interval, timeout, ipDelete, _ := heartBeats(inst.Metadata)
	md := maps.Clone(inst.Metadata)
	if md == nil {
		md = map[string]string{}
	}
	return model.Instance{
		InstanceId:                inst.InstanceId,
		Ip:                        inst.Ip,
		Port:                      inst.Port,
		Weight:                    inst.Weight,
		Healthy:                   inst.Healthy,
		Enable:                    inst.Enable,
		Ephemeral:                 true,
		ClusterName:               cluster,
		ServiceName:               k.grouped(),
		Metadata:                  md,
		InstanceHeartBeatInterval: int(interval),
		InstanceHeartBeatTimeOut:  int(timeout),
		IpDeleteTimeout:           int(ipDelete),
	}
}

func copyInstance(inst model.Instance) model.Instance {
	inst.Metadata = maps.Clone(inst.Metadata)
	return inst
}
